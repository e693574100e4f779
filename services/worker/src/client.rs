//! The gRPC client, with the worker's token on every call. The channel connects lazily and
//! reconnects by itself, so a controller restart only costs the calls made while it is down.

use lathe_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
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
    let endpoint = Endpoint::from_shared(config.controller_url.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let token: MetadataValue<Ascii> = format!("Bearer {}", config.token)
        .parse()
        .map_err(|_| WorkerError::Setting { field: "token", message: "must be printable ASCII".into() })?;
    Ok(WorkerServiceClient::with_interceptor(endpoint.connect_lazy(), Auth(token)))
}
