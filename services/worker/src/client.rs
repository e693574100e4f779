//! The gRPC client, with the worker's token on every call. The channel connects lazily and
//! reconnects by itself, so a controller restart only costs the calls made while it is down.

use lathe_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

use crate::{WorkerConfig, WorkerError};

#[derive(Clone)]
pub struct Auth(MetadataValue<Ascii>);

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type Client = WorkerServiceClient<InterceptedService<Channel, Auth>>;

pub fn connect(config: &WorkerConfig) -> Result<Client, WorkerError> {
    let bad = |message: String| WorkerError::ControllerUrl { url: config.controller_url.clone(), message };
    let mut endpoint = Endpoint::from_shared(config.controller_url.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if config.controller_url.starts_with("https://") {
        endpoint = endpoint.tls_config(tls_config(&config.tls)?).map_err(|e| bad(format!("TLS: {e}")))?;
    } else if config.tls.ca.is_some() || config.tls.cert.is_some() {
        return Err(bad("TLS settings are given but the address is not https://".into()));
    }
    let token: MetadataValue<Ascii> = format!("Bearer {}", config.token)
        .parse()
        .map_err(|_| WorkerError::Setting { field: "token", message: "must be printable ASCII".into() })?;
    Ok(WorkerServiceClient::with_interceptor(endpoint.connect_lazy(), Auth(token)))
}

/// The worker's TLS: the controller's CA (else the system's roots) and, for mutual TLS, the
/// worker's own certificate and key.
fn tls_config(tls: &crate::config::ClientTls) -> Result<ClientTlsConfig, WorkerError> {
    let read = |field: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| WorkerError::Setting { field, message: format!("{}: {e}", path.display()) })
    };
    let mut config = ClientTlsConfig::new();
    config = match &tls.ca {
        Some(ca) => config.ca_certificate(Certificate::from_pem(read("tls-ca", ca)?)),
        None => config.with_native_roots(),
    };
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => Ok(config.identity(Identity::from_pem(read("tls-cert", cert)?, read("tls-key", key)?))),
        (None, None) => Ok(config),
        _ => Err(WorkerError::Setting { field: "tls-cert", message: "give both --tls-cert and --tls-key, or neither".into() }),
    }
}
