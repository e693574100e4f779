//! What every handler, the gRPC service and the reconciler share: the pool, the queue, the
//! configuration and the metrics. Cheap to clone.

use std::sync::Arc;

use lathe_queue::Queue;
use lathe_store::PgPool;

use crate::storage::Storage;
use crate::telemetry::Telemetry;
use crate::{ControllerConfig, ControllerError};

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub queue: Queue,
    pub config: Arc<ControllerConfig>,
    pub storage: Storage,
    pub telemetry: Arc<Telemetry>,
}

impl AppState {
    pub async fn connect(config: ControllerConfig) -> Result<AppState, ControllerError> {
        let pool = lathe_store::connect(&config.database_url, config.max_db_connections).await?;
        let queue = Queue::open(&config.redis_url, &config.redis_prefix).await?;
        let storage = Storage::open(&config.data_dir)?;
        Ok(AppState { pool, queue, storage, config: Arc::new(config), telemetry: Arc::new(Telemetry::new()) })
    }
}
