//! What the autoscaler reads from the controller: demand per pool and the live workers
//! (`/v1/admin/…`, with the admin token).

use std::time::Duration;

use serde::Deserialize;

use crate::FleetError;

#[derive(Debug, Clone, Deserialize)]
pub struct PoolDemand {
    pub pool: String,
    /// Jobs and evaluations queued or running: the workers the pool needs.
    pub demand: u64,
    /// The same work by shape (absent from controllers older than shapes: then all of it is
    /// taken as one GPU on one node).
    #[serde(default)]
    pub shapes: Vec<Shape>,
}

/// Queued and running work of one shape: GPUs per node, nodes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Shape {
    pub gpus: u32,
    pub nodes: u32,
    pub queued: u64,
    pub running: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSeen {
    pub id: String,
    pub state: String,
    pub pools: Vec<String>,
    pub slurm_job_id: Option<String>,
    #[serde(default = "one")]
    pub gpus: u32,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
struct List<T> {
    data: Vec<T>,
    #[serde(default)]
    has_more: bool,
}

pub struct Controller {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Controller {
    pub fn new(base: &str, admin_token: &str) -> Result<Controller, FleetError> {
        let http = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .map_err(|e| FleetError::Controller { url: base.into(), message: e.to_string() })?;
        Ok(Controller { base: base.trim_end_matches('/').to_string(), token: admin_token.to_string(), http })
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, FleetError> {
        let url = format!("{}{path}", self.base);
        let failed = |message: String| FleetError::Controller { url: url.clone(), message };
        let response = self.http.get(&url).bearer_auth(&self.token).send().map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().unwrap_or_default();
            return Err(failed(format!("{status}: {}", body.chars().take(300).collect::<String>())));
        }
        response.json().map_err(|e| failed(format!("unexpected answer: {e}")))
    }

    /// Demand of every pool with work or workers.
    pub fn demand(&self) -> Result<Vec<PoolDemand>, FleetError> {
        Ok(self.get::<List<PoolDemand>>("/v1/admin/demand")?.data)
    }

    /// The live workers, every page of them (a fleet of thousands is several pages).
    pub fn workers(&self) -> Result<Vec<WorkerSeen>, FleetError> {
        let mut workers: Vec<WorkerSeen> = Vec::new();
        loop {
            let after = workers.last().map(|w| format!("&after={}", w.id)).unwrap_or_default();
            let page = self.get::<List<WorkerSeen>>(&format!("/v1/admin/workers?state=live&limit=1000{after}"))?;
            let more = page.has_more && !page.data.is_empty();
            workers.extend(page.data);
            if !more {
                return Ok(workers);
            }
        }
    }
}
