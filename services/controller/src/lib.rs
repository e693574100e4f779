//! The controller: the one process that holds database credentials. It serves the
//! OpenAI-compatible REST API to users, the gRPC `WorkerService` to GPU workers, and runs the
//! reconciler; it is stateless (everything lives in Postgres, Redis only carries wake-ups), so
//! several replicas can run side by side.
//!
//! ```text
//! openai SDK / lathe CLI ──REST──▶ api::router ──┐
//!                                                 ├──▶ lathe-store (Postgres) ◀── reconciler
//! lathe worker ──gRPC (register, heartbeat,   ────┘          │                    │ requeue
//!                claim, Attempt stream)                      ▼                    ▼ republish
//!                                          lathe-queue (Redis wake-ups) ◀─────────┘
//!
//! openai SDK ──/v1/chat/completions──▶ inference::Router ══Serve stream══▶ lathe worker --serve
//! ```
//!
//! Handlers are thin: they parse, call a plain function of `lathe-store` / `lathe-core`, and
//! render the OpenAI object (`api::views`). Uploaded files and job outputs live under the data
//! directory ([`storage`]), in paths made from ids only.

pub mod adapters;
pub mod api;
pub mod base_models;
pub mod cli;
pub mod config;
pub mod data_check;
pub mod error;
pub mod grpc;
pub mod http_server;
pub mod inference;
pub mod rate_limit;
pub mod reconciler;
pub mod result_file;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod tracking;
pub mod upload;

use std::future::Future;
use std::net::SocketAddr;

pub use config::ControllerConfig;
pub use error::ControllerError;
pub use state::AppState;

/// A controller whose listeners are bound; `serve` runs it until `shutdown` resolves.
pub struct BoundController {
    pub state: AppState,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    http: tokio::net::TcpListener,
    grpc: tokio::net::TcpListener,
}

impl BoundController {
    /// Connects to Postgres (creating and migrating the database if needed) and Redis, and
    /// binds both listeners, so that the caller knows the addresses before serving.
    pub async fn bind(config: ControllerConfig) -> Result<BoundController, ControllerError> {
        let state = AppState::connect(config).await?;
        if let Some(secret) = &state.config.fleet_secret {
            let terms = &state.config.fleet_terms;
            let fleet = lathe_store::fleets::ensure_fleet_secret(&state.pool, config::FLEET_FROM_CONFIG, secret, terms).await?;
            if fleet.revoked_at.is_some() {
                tracing::warn!(fleet = fleet.name, "the fleet of --fleet-secret is revoked: workers cannot enrol with it");
            }
        }
        let http = tokio::net::TcpListener::bind(&state.config.http_listen)
            .await
            .map_err(|e| ControllerError::Bind(state.config.http_listen.clone(), e))?;
        let grpc = tokio::net::TcpListener::bind(&state.config.grpc_listen)
            .await
            .map_err(|e| ControllerError::Bind(state.config.grpc_listen.clone(), e))?;
        let http_addr = http.local_addr().map_err(|e| ControllerError::Bind(state.config.http_listen.clone(), e))?;
        let grpc_addr = grpc.local_addr().map_err(|e| ControllerError::Bind(state.config.grpc_listen.clone(), e))?;
        Ok(BoundController { state, http_addr, grpc_addr, http, grpc })
    }

    /// Serves REST and gRPC and runs the reconciler until `shutdown` resolves.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), ControllerError> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        };
        tracing::info!(http = %self.http_addr, grpc = %self.grpc_addr, "controller listening");

        let config = &self.state.config;
        grpc::listener::raise_file_limit(config.max_connections, config.grpc_max_connections);
        let reconciler = tokio::spawn(reconciler::run(self.state.clone(), stop_rx.clone()));
        tokio::spawn(grpc::revocation::run(self.state.clone(), stop_rx.clone()));
        tokio::spawn(grpc::control::run(self.state.clone(), stop_rx.clone()));
        tokio::spawn(tracking::run(self.state.clone(), stop_rx.clone()));
        let router = api::router(self.state.clone());
        let limits = http_server::Limits {
            max_connections: self.state.config.max_connections,
            header_read_timeout: self.state.config.header_read_timeout,
        };
        let http = http_server::serve(self.http, router, limits, wait(stop_rx.clone()));
        // Pings find a frozen or vanished worker (no reset ever comes): its connection, and
        // with it its Attempt or Serve stream, closes after one unanswered ping.
        let mut builder = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(config.grpc_keepalive))
            .http2_keepalive_timeout(Some(config.grpc_keepalive));
        if let Some(tls) = &config.grpc_tls {
            let tls = grpc_tls_config(tls)?.timeout(config.grpc_handshake_timeout);
            builder = builder.tls_config(tls).map_err(|e| ControllerError::Config(format!("gRPC TLS: {e}")))?;
        }
        let limits = grpc::listener::Limits {
            max_connections: config.grpc_max_connections,
            handshake_timeout: config.grpc_handshake_timeout,
            tls: config.grpc_tls.is_some(),
        };
        let grpc = builder
            .add_service(grpc::server(self.state.clone()))
            .serve_with_incoming_shutdown(grpc::listener::incoming(self.grpc, limits), wait(stop_rx.clone()));
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let (http, grpc) = tokio::join!(http, grpc);
        http.map_err(ControllerError::Serve)?;
        grpc.map_err(|e| ControllerError::Serve(std::io::Error::other(e)))?;
        let _ = reconciler.await;
        Ok(())
    }
}

/// The gRPC listener's TLS from its PEM files; with a client CA, workers must present a
/// certificate it signed (mutual TLS).
fn grpc_tls_config(tls: &config::GrpcTls) -> Result<tonic::transport::ServerTlsConfig, ControllerError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |path: &std::path::Path| std::fs::read(path).map_err(|source| ControllerError::DataDir { path: path.into(), source });
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?));
    if let Some(ca) = &tls.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(config)
}

#[cfg(test)]
mod error_map_tests;
