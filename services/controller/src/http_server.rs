//! The REST listener, served with hyper directly (not `axum::serve`) so that connections are
//! bounded: a flood of silent or slow connections once exhausted the file descriptors and
//! `/healthz` stopped answering.
//!
//! - A client must send a whole request head within `header_read_timeout` of connecting, and
//!   of its previous response on a kept-alive connection (hyper's timer covers both), or the
//!   connection is closed: silent and idle connections do not pile up.
//! - At most `max_connections` are open. At the cap, a new connection evicts the oldest one
//!   with no request in flight and none arriving (silent, or idle between requests; a client
//!   in the middle of sending its request head is never evicted).
//! - If every connection is busy (one tenant holding streams, say), up to [`PROBE_RESERVE`]
//!   more are let in as probe connections: they answer `/healthz`, `/readyz` and `/metrics`
//!   and nothing else (503 with Retry-After), so health probes always get in. Per-key stream
//!   caps (`api::limits::StreamCounts`) keep one tenant from getting there in the first place.
//! - Shutdown stops accepting and lets requests in flight finish, for at most 20 s.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// Connections let in beyond the cap, for health probes only.
pub const PROBE_RESERVE: usize = 16;

/// The paths a probe connection answers.
const PROBE_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The peer of the connection a request came on (a request extension), for per-address limits.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

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
    /// Bytes arrived since the last request started: a request head on its way.
    receiving: AtomicBool,
    evict: Notify,
    /// Let in beyond the cap: answers the probe paths only.
    probe_only: bool,
}

impl Connection {
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && !self.receiving.load(Ordering::Acquire)
    }
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    open: BTreeMap<u64, Arc<Connection>>,
    probes: usize,
}

impl Registry {
    /// Registers a new connection, evicting the oldest idle one at the cap. When every open
    /// connection is busy, a probe-only connection within the reserve; None beyond it.
    fn admit(&mut self, max: usize) -> Option<(u64, Arc<Connection>)> {
        let regular = self.open.len() - self.probes;
        let mut probe_only = false;
        if regular >= max {
            let idle = self.open.iter().find(|(_, c)| !c.probe_only && c.idle()).map(|(id, _)| *id);
            match idle.and_then(|id| self.open.remove(&id)) {
                Some(evicted) => evicted.evict.notify_one(),
                None if self.probes < PROBE_RESERVE => probe_only = true,
                None => return None,
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let connection =
            Arc::new(Connection { in_flight: AtomicUsize::new(0), receiving: AtomicBool::new(false), evict: Notify::new(), probe_only });
        self.probes += usize::from(probe_only);
        self.open.insert(id, connection.clone());
        Some((id, connection))
    }

    fn remove(&mut self, id: u64) {
        if let Some(connection) = self.open.remove(&id) {
            self.probes -= usize::from(connection.probe_only);
        }
    }
}

/// A connection's socket, noting when bytes arrive (a request head being sent).
struct Watched {
    stream: tokio::net::TcpStream,
    connection: Arc<Connection>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.connection.receiving.store(true, Ordering::Release);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// What a probe connection answers to anything but the probe paths.
fn probes_only() -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut response = crate::api::error::ApiError {
        status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        message: "Every connection is busy; this one answers health probes only. Retry shortly.".into(),
        param: None,
        code: Some("overloaded".into()),
    }
    .into_response();
    response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(2));
    response
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
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
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
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            counted.in_flight.fetch_add(1, Ordering::AcqRel);
            counted.receiving.store(false, Ordering::Release);
            let guard = InFlight(counted.clone());
            let mut router = router.clone();
            let refused = counted.probe_only && !PROBE_PATHS.contains(&request.uri().path());
            request.extensions_mut().insert(ClientAddr(peer));
            async move {
                if refused {
                    return Ok(probes_only().map(|body| Body::new(Guarded { inner: body, _guard: guard })));
                }
                let response = router.call(request.map(Body::new)).await?;
                // The guard lives as long as the body: a streaming response (SSE, a download)
                // keeps its connection busy until it ends.
                Ok::<_, std::convert::Infallible>(response.map(|body| Body::new(Guarded { inner: body, _guard: guard })))
            }
        });
        let watched = Watched { stream, connection: connection.clone() };
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(watched), service));
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
            registry.lock().expect("registry lock").remove(id);
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
        // A client in the middle of sending its request head is not idle either.
        registry.open.get(&third).unwrap().receiving.store(true, Ordering::Release);
        let (probe, connection) = registry.admit(2).expect("every connection busy: a probe connection");
        assert!(connection.probe_only);
        assert!(registry.open.contains_key(&third), "a client sending its head was evicted");
        for _ in 1..PROBE_RESERVE {
            assert!(registry.admit(2).unwrap().1.probe_only);
        }
        assert!(registry.admit(2).is_none(), "beyond the probe reserve a new connection is refused");
        registry.remove(probe);
        assert!(registry.admit(2).is_some_and(|(_, c)| c.probe_only), "a closed probe frees its place");
    }
}
