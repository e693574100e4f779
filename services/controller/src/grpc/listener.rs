//! The worker port's own bounds, so that nothing done to it reaches the REST port (a flood of
//! silent connections once exhausted the process's file descriptors, and `/healthz` stopped
//! answering with it):
//!
//! - At most `max_connections` are open; a connection beyond that is accepted and closed at
//!   once (workers reconnect with backoff), so the kernel's backlog never fills with it.
//! - A new connection must start talking within `handshake_timeout`: its first byte, and
//!   (plaintext) the whole 24-byte HTTP/2 client preface, or it is closed. With TLS, tonic's
//!   handshake timeout applies too.
//! - Once it speaks HTTP/2, the server pings it every keepalive interval and closes it when a
//!   ping goes unanswered (`Server::http2_keepalive_*`, set where the server is built): a
//!   frozen process or a host that went away without a reset loses its streams.
//! - Accept errors (EMFILE and friends) back off instead of spinning.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The HTTP/2 client preface: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".
const PREFACE_BYTES: usize = 24;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// TLS on the port: only the first byte is awaited here (the preface is inside TLS).
    pub tls: bool,
}

/// Accepted connections for `Server::serve_with_incoming_shutdown`, each holding its place
/// under the cap until tonic drops it.
pub fn incoming(listener: TcpListener, limits: Limits) -> ReceiverStream<io::Result<BoundedConnection>> {
    let (sender, receiver) = mpsc::channel(64);
    let places = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        tracing::warn!(%error, "gRPC accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                // The server stopped taking connections (shutdown): stop accepting.
                () = sender.closed() => return,
            };
            let Ok(place) = places.clone().try_acquire_owned() else {
                tracing::warn!(max = limits.max_connections, "gRPC connection cap reached: refusing a new connection");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let needed = if limits.tls { 1 } else { PREFACE_BYTES };
            let connection = BoundedConnection {
                inner: stream,
                _place: place,
                handshake: Some(Handshake { needed, deadline: Box::pin(tokio::time::sleep(limits.handshake_timeout)) }),
            };
            if sender.send(Ok(connection)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// A TCP connection under the worker port's bounds.
pub struct BoundedConnection {
    inner: TcpStream,
    _place: OwnedSemaphorePermit,
    /// Until the peer has sent its first bytes: how many more, and by when.
    handshake: Option<Handshake>,
}

struct Handshake {
    needed: usize,
    deadline: Pin<Box<Sleep>>,
}

impl AsyncRead for BoundedConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(handshake) = &mut this.handshake {
            if handshake.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the peer did not start talking in time")));
            }
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(handshake)) = (&polled, &mut this.handshake) {
            let read = buf.filled().len() - before;
            handshake.needed = handshake.needed.saturating_sub(read);
            if handshake.needed == 0 {
                this.handshake = None;
            }
        }
        polled
    }
}

impl AsyncWrite for BoundedConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for BoundedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

/// Raises this process's open-file limit to its hard limit, and says when the two ports'
/// connection caps (plus a margin for Postgres, Redis and files) could still exhaust it.
pub fn raise_file_limit(rest_connections: usize, grpc_connections: usize) {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        let needed = (rest_connections + grpc_connections + 256) as libc::rlim_t;
        if limit.rlim_cur < needed {
            tracing::warn!(
                open_files = limit.rlim_cur,
                needed,
                "the open-file limit is below --max-connections + --grpc-max-connections + 256: lower the caps or raise `ulimit -n`"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    async fn bound(limits: Limits) -> (std::net::SocketAddr, ReceiverStream<io::Result<BoundedConnection>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, incoming(listener, limits))
    }

    #[tokio::test]
    async fn a_connection_that_stays_silent_is_closed_after_the_handshake_timeout() {
        let limits = Limits { max_connections: 8, handshake_timeout: Duration::from_millis(200), tls: false };
        let (addr, mut accepted) = bound(limits).await;
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut connection = accepted.next().await.unwrap().unwrap();
        let mut byte = [0u8; 1];
        let error = tokio::time::timeout(Duration::from_secs(5), connection.read(&mut byte)).await.unwrap().unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_peer_that_sends_its_preface_is_not_timed_out_later() {
        let limits = Limits { max_connections: 8, handshake_timeout: Duration::from_millis(200), tls: false };
        let (addr, mut accepted) = bound(limits).await;
        let mut peer = TcpStream::connect(addr).await.unwrap();
        peer.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut connection = accepted.next().await.unwrap().unwrap();
        let mut preface = [0u8; 24];
        connection.read_exact(&mut preface).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        peer.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        connection.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"x");
    }

    #[tokio::test]
    async fn beyond_the_cap_a_connection_is_closed_at_once_and_a_freed_place_is_reused() {
        let limits = Limits { max_connections: 2, handshake_timeout: Duration::from_secs(30), tls: false };
        let (addr, mut accepted) = bound(limits).await;
        let _a = TcpStream::connect(addr).await.unwrap();
        let _b = TcpStream::connect(addr).await.unwrap();
        let first = accepted.next().await.unwrap().unwrap();
        let _second = accepted.next().await.unwrap().unwrap();
        let mut third = TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut byte)).await.expect("closed at once, not left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "the connection over the cap is closed");
        drop(first);
        let _d = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), accepted.next())
            .await
            .expect("a freed place takes a new connection")
            .unwrap()
            .unwrap();
    }
}
